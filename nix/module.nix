# NixOS module: `services.blixard` runs a Blixard node as a systemd service.
#
# Imported by the flake as `nixosModules.default`; it also works on its own
# (`imports = [ /path/to/blixard/nix/module.nix ];`), building the package from this
# checkout. Options are listed in docs/nix.md. nix/check.sh evaluates the option
# declarations and the generated service offline with a stub lib (nix/stub-lib.nix).
{
  config,
  lib,
  pkgs,
  utils,
  ...
}:

let
  cfg = config.services.blixard;
  inherit (lib) mkOption mkEnableOption types;

  # The same wrapper as the Debian unit (packaging/systemd/blixard-start): adds --init or
  # --join-file FILE only while DATA_DIR/raft.redb does not exist, then
  # execs blixard (so blixard is the main process: READY=1, SIGTERM).
  startWrapper = pkgs.writeShellScript "blixard-start" (builtins.readFile ../packaging/systemd/blixard-start);

  runFlags =
    lib.optionals (cfg.configFile != null) [ "--config" "${cfg.configFile}" ]
    ++ lib.optionals (cfg.listen != null) [ "--listen" cfg.listen ]
    ++ lib.optionals (cfg.relay != null) [ "--relay" cfg.relay ]
    ++ lib.optionals (cfg.resources.cpus != null) [ "--cpus" (toString cfg.resources.cpus) ]
    ++ lib.optionals (cfg.resources.memoryMiB != null) [ "--memory-mib" (toString cfg.resources.memoryMiB) ]
    ++ lib.optionals (cfg.resources.diskGiB != null) [ "--disk-gib" (toString cfg.resources.diskGiB) ]
    ++ lib.concatMap (k: [ "--label" "${k}=${cfg.labels.${k}}" ]) (lib.attrNames cfg.labels)
    ++ lib.optionals (cfg.backend != null) [ "--backend" cfg.backend ]
    ++ cfg.extraFlags;

  command = [ "${cfg.package}/bin/blixard" "--data-dir" cfg.dataDir "node" "run" ] ++ runFlags;

  # "10.0.0.1:7000" or "[fd00::1]:7000" -> 7000
  listenPort = if cfg.listen == null then null else lib.toInt (lib.last (lib.splitString ":" cfg.listen));

  underVarLib = lib.hasPrefix "/var/lib/" cfg.dataDir;
in
{
  options.services.blixard = {
    enable = mkEnableOption "the Blixard node (micro-VMs on a peer-to-peer mesh)";

    package = mkOption {
      type = types.package;
      default = pkgs.callPackage ./package.nix { };
      defaultText = lib.literalExpression "pkgs.callPackage ./nix/package.nix { } (this checkout)";
      description = "The blixard package. The flake's module sets it to the flake's `packages.blixard`.";
    };

    dataDir = mkOption {
      type = types.str;
      default = "/var/lib/blixard";
      description = ''
        The node's data dir: its key (node.key), Raft store (raft.redb), local state
        (node.json), audit log and, on the first node, admin.ticket. Back it up as a whole
        (docs/operations.md). Paths under /var/lib/ become the unit's StateDirectory;
        others are created by systemd-tmpfiles.
      '';
    };

    listen = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "10.0.0.1:7000";
      description = ''
        UDP address (QUIC) to listen on, `--listen`. Give an address the other nodes can
        reach. `null`: the binary's default (the address used last time, else 127.0.0.1 on
        a free port, which only suits a single-machine cluster).
      '';
    };

    relay = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "https://relay.example.org";
      description = "An operator-run iroh relay URL, `--relay`. `null`: no relay; peers are dialled directly.";
    };

    resources = {
      cpus = mkOption {
        type = types.nullOr types.ints.positive;
        default = null;
        description = "vCPUs this node offers to VMs, `--cpus`. `null`: all of the host's.";
      };
      memoryMiB = mkOption {
        type = types.nullOr types.ints.positive;
        default = null;
        description = "Memory in MiB this node offers to VMs, `--memory-mib`. `null`: all of the host's.";
      };
      diskGiB = mkOption {
        type = types.nullOr types.ints.positive;
        default = null;
        description = "Disk in GiB this node offers to VMs, `--disk-gib`. `null`: the free space of the data dir.";
      };
    };

    labels = mkOption {
      type = types.attrsOf types.str;
      default = { };
      example = { zone = "a"; };
      description = "Labels used by placement, one `--label k=v` each.";
    };

    joinTicketFile = mkOption {
      type = types.nullOr types.path;
      default = null;
      example = "/run/secrets/blixard-join-ticket";
      description = ''
        A file holding a voter or learner ticket (`blixard cluster ticket`). On the first
        start only (while DATA_DIR/raft.redb does not exist) the node runs with
        `--join-file FILE` (blixard reads the ticket). The ticket never enters the Nix store or the unit: give a path
        to a secret outside the store, readable by the `blixard` user. Delete or revoke it
        once the node joined; tickets expire anyway (default 1h).
      '';
    };

    init = mkOption {
      type = types.bool;
      default = false;
      description = ''
        On the first start only, create a new cluster with this node as its first voter
        (`--init`); the client ticket is written to DATA_DIR/admin.ticket. Set it on
        exactly one node, never together with joinTicketFile.
      '';
    };

    backend = mkOption {
      type = types.nullOr (types.enum [ "auto" "microvm" "qemu" ]);
      default = null;
      description = ''
        The VM backends to run, `--backend`: `auto` (both: a Nix-closure image runs on
        microvm, a bundle on qemu), `microvm` or `qemu`. `null` (the default) passes no flag,
        which is `auto`.
      '';
    };

    configFile = mkOption {
      type = types.nullOr types.path;
      default = null;
      description = "A TOML file with any of the `node run` settings, `--config` (flags set here win).";
    };

    extraFlags = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "--label" "rack=r1" ];
      description = "More arguments for `blixard node run`, appended last.";
    };

    openFirewall = mkOption {
      type = types.bool;
      default = false;
      description = "Open the UDP port of `listen` in the firewall (needs `listen` with a fixed port).";
    };
  };

  config = lib.mkIf cfg.enable {
    assertions = [
      {
        assertion = !(cfg.init && cfg.joinTicketFile != null);
        message = "services.blixard: set either init (create a cluster) or joinTicketFile (join one), not both.";
      }
      {
        assertion = !cfg.openFirewall || (listenPort != null && listenPort != 0);
        message = "services.blixard.openFirewall needs services.blixard.listen with a fixed port, e.g. \"10.0.0.1:7000\".";
      }
      {
        # A Nix path literal (./ticket) would be copied into the world-readable store.
        assertion = cfg.joinTicketFile == null || !(builtins.isPath cfg.joinTicketFile);
        message = "services.blixard.joinTicketFile must be a string path outside the Nix store (\"/run/secrets/...\"), not a Nix path literal.";
      }
      {
        assertion = lib.hasPrefix "/" cfg.dataDir;
        message = "services.blixard.dataDir must be an absolute path.";
      }
    ];

    users.users.blixard = {
      isSystemUser = true;
      group = "blixard";
      # /dev/kvm is root:kvm 0660.
      extraGroups = [ "kvm" ];
      home = cfg.dataDir;
      description = "Blixard node";
    };
    users.groups.blixard = { };

    # The CLI, for `blixard --data-dir ${cfg.dataDir} cluster status` as root.
    environment.systemPackages = [ cfg.package ];

    networking.firewall.allowedUDPPorts = lib.optional (cfg.openFirewall && listenPort != null) listenPort;

    systemd.tmpfiles.rules = lib.optional (!underVarLib) "d ${cfg.dataDir} 0700 blixard blixard - -";

    systemd.services.blixard = {
      description = "Blixard node (micro-VMs on a peer-to-peer mesh)";
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ];
      after = [ "network-online.target" ];
      startLimitIntervalSec = 300;
      startLimitBurst = 5;

      environment =
        lib.optionalAttrs cfg.init { BLIXARD_INIT = "1"; }
        // lib.optionalAttrs (cfg.joinTicketFile != null) { BLIXARD_JOIN_TICKET_FILE = toString cfg.joinTicketFile; };

      serviceConfig = {
        # blixard sends READY=1 once it has bootstrapped, joined or resumed.
        Type = "notify";
        NotifyAccess = "main";
        ExecStart = "${startWrapper} ${utils.escapeSystemdExecArgs command}";
        Restart = "on-failure";
        RestartSec = "5s";
        TimeoutStartSec = "5min";
        # SIGTERM stops the node cleanly; what is left (hypervisors it started) is killed
        # once the node exited or the timeout passed.
        KillSignal = "SIGTERM";
        KillMode = "mixed";
        TimeoutStopSec = "90s";

        User = "blixard";
        Group = "blixard";
        SupplementaryGroups = [ "kvm" ];
        StateDirectory = lib.mkIf underVarLib (lib.removePrefix "/var/lib/" cfg.dataDir);
        StateDirectoryMode = "0700";
        UMask = "0077";
        LimitNOFILE = 65536;

        # Hardening (the same as packaging/systemd/blixard.service).
        CapabilityBoundingSet = [ "CAP_NET_ADMIN" ];
        AmbientCapabilities = [ "CAP_NET_ADMIN" ];
        # No setuid helpers: qemu gets taps with script=no.
        NoNewPrivileges = true;
        ProtectSystem = "strict";
        ReadWritePaths = [ cfg.dataDir ];
        ProtectHome = true;
        PrivateTmp = true;
        # Not PrivateDevices: it would hide /dev/kvm. Add /dev/vhost-net for vhost-net.
        DevicePolicy = "closed";
        DeviceAllow = [ "/dev/kvm rw" "/dev/net/tun rw" ];
        RestrictAddressFamilies = [ "AF_UNIX" "AF_INET" "AF_INET6" "AF_NETLINK" ];
        ProtectKernelModules = true;
        ProtectKernelLogs = true;
        ProtectControlGroups = true;
        ProtectClock = true;
        ProtectHostname = true;
        LockPersonality = true;
        RestrictRealtime = true;
        RestrictSUIDSGID = true;
        SystemCallArchitectures = "native";
        # Deliberately not set: MemoryDenyWriteExecute (qemu's TCG generates code),
        # RestrictNamespaces and SystemCallFilter (hypervisors, virtiofsd),
        # ProtectKernelTunables (host networking may set sysctls).
      };
    };
  };
}
