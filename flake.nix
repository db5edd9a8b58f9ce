{
  description = "Blixard: micro-VMs on a peer-to-peer mesh of machines that trust nothing but keys";

  # There is no flake.lock in the repository yet: it was written on machines without
  # network access, where `nix flake lock` cannot run. The first `nix build` (or
  # `nix flake lock`) with network access creates it; commit it then. See docs/nix.md.
  inputs = {
    nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";
    flake-parts = {
      url = "github:hercules-ci/flake-parts";
      inputs.nixpkgs-lib.follows = "nixpkgs";
    };
    microvm = {
      url = "github:microvm-nix/microvm.nix";
      inputs.nixpkgs.follows = "nixpkgs";
    };
  };

  outputs =
    inputs@{ self, nixpkgs, flake-parts, microvm, ... }:
    flake-parts.lib.mkFlake { inherit inputs; } (
      { ... }:
      let
        # An example guest (images/microvm/HYPERVISOR.nix) as a NixOS system for microvm.nix.
        mkGuest =
          system: hypervisor:
          nixpkgs.lib.nixosSystem {
            modules = [
              microvm.nixosModules.microvm
              ./images/microvm/${hypervisor}.nix
              { nixpkgs.hostPlatform = system; }
            ];
          };
      in
      {
        systems = [ "x86_64-linux" "aarch64-linux" ];

        flake = {
          # services.blixard, with the package defaulting to this flake's.
          nixosModules.default =
            { lib, pkgs, ... }:
            {
              imports = [ ./nix/module.nix ];
              services.blixard.package = lib.mkDefault self.packages.${pkgs.stdenv.hostPlatform.system}.blixard;
            };
          nixosModules.blixard = self.nixosModules.default;

          # Example microVM guests; their runners are packages.microvm-* below.
          nixosConfigurations = {
            blixard-guest-qemu = mkGuest "x86_64-linux" "qemu";
            blixard-guest-cloud-hypervisor = mkGuest "x86_64-linux" "cloud-hypervisor";
          };
        };

        perSystem =
          { pkgs, self', system, ... }:
          let
            # A host with the module enabled: evaluating its toplevel checks the module's
            # assertions and option types against the real NixOS module system.
            host = nixpkgs.lib.nixosSystem {
              modules = [
                self.nixosModules.default
                {
                  nixpkgs.hostPlatform = system;
                  boot.isContainer = true;
                  system.stateVersion = nixpkgs.lib.trivial.release;
                  services.blixard = {
                    enable = true;
                    init = true;
                    listen = "10.0.0.1:7000";
                    openFirewall = true;
                    labels.zone = "a";
                    resources.cpus = 2;
                  };
                }
              ];
            };
          in
          {
            packages = {
              blixard = pkgs.callPackage ./nix/package.nix { };
              default = self'.packages.blixard;
              # microvm.nix runners (bin/microvm-run, bin/microvm-shutdown, share/microvm/).
              microvm-qemu = (mkGuest system "qemu").config.microvm.declaredRunner;
              microvm-cloud-hypervisor = (mkGuest system "cloud-hypervisor").config.microvm.declaredRunner;
            };

            devShells.default = pkgs.mkShell {
              inputsFrom = [ self'.packages.blixard ];
              packages = with pkgs; [
                clippy
                rustfmt
                rust-analyzer
                # what the tests and the node run
                qemu_kvm
                iproute2
                nftables
                pkgsStatic.busybox
                e2fsprogs
                cpio
                # nix/check.sh
                jq
                shellcheck
                systemd
              ];
            };

            checks = {
              package = self'.packages.blixard;

              # The module evaluates under the real module system; its unit file builds.
              module = pkgs.runCommand "blixard-module-eval" { } ''
                echo ${builtins.unsafeDiscardStringContext host.config.system.build.toplevel.drvPath} > $out
                cat ${host.config.systemd.units."blixard.service".unit}/blixard.service >> $out
              '';

              # One node in a NixOS VM: the unit starts (Type=notify: active means the node
              # sent READY=1 after bootstrapping) and the CLI reaches it.
              nixos-single-node = pkgs.testers.runNixOSTest {
                name = "blixard-single-node";
                nodes.machine = {
                  imports = [ self.nixosModules.default ];
                  services.blixard = {
                    enable = true;
                    init = true;
                  };
                };
                testScript = ''
                  machine.wait_for_unit("blixard.service")
                  machine.succeed("test -s /var/lib/blixard/admin.ticket")
                  machine.succeed("BLIXARD_CONFIG_DIR=/root/.blixard-cli blixard --data-dir /var/lib/blixard cluster status")
                  machine.systemctl("restart blixard.service")
                  machine.wait_for_unit("blixard.service")
                  machine.succeed("BLIXARD_CONFIG_DIR=/root/.blixard-cli blixard --data-dir /var/lib/blixard cluster status")
                '';
              };

              # The example guests evaluate and their runners build.
              microvm-qemu = self'.packages.microvm-qemu;
              microvm-cloud-hypervisor = self'.packages.microvm-cloud-hypervisor;
            };
          };
      }
    );
}
