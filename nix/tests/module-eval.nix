# Evaluates nix/module.nix with the stub lib (nix/stub-lib.nix) and stub pkgs: no nixpkgs.
# Used by nix/check.sh:
#   nix-instantiate --eval --strict --json nix/tests/module-eval.nix \
#     --arg settings '{ enable = true; ... }' --argstr fakePackage DIR --argstr scriptsDir DIR
# Fails (throws) if an expected option is missing, if a default or a setting does not
# pass its option's type, or if a module assertion fails. Returns the option list and the
# generated service (systemd.services.blixard, networking, users, tmpfiles) as JSON.
{
  settings ? { },
  # A directory with bin/blixard: stands in for the package.
  fakePackage ? "/nonexistent/blixard",
  # Where check.sh writes the scripts the module makes with pkgs.writeShellScript.
  scriptsDir ? "/nonexistent/scripts",
}:

let
  lib = import ../stub-lib.nix;
  inherit (builtins) attrNames concatMap filter isAttrs listToAttrs map removeAttrs;

  pkgs = {
    # The store path names the text's hash, so check.sh can tell which script it is.
    writeShellScript = name: text: {
      type = "derivation";
      inherit name text;
      outPath = "${scriptsDir}/${name}-${builtins.hashString "sha256" text}";
    };
    callPackage = _fn: _args: {
      type = "derivation";
      name = "blixard";
      outPath = fakePackage;
    };
  };

  isOption = v: isAttrs v && (v._type or null) == "option";

  # Every option as { path = [ ... ]; option = ...; }, recursing into groups (resources).
  flatten =
    prefix: set:
    concatMap (
      n:
      let v = set.${n}; in
      if isOption v then [ { path = prefix ++ [ n ]; option = v; } ] else flatten (prefix ++ [ n ]) v
    ) (attrNames set);

  checked =
    name: opt: value:
    if opt.type.check value then value else throw "services.blixard.${name}: value does not match type ${opt.type.name}";

  # The option values: settings over defaults, each checked against its type.
  fill =
    prefix: opts: set:
    builtins.mapAttrs (
      n: o:
      let name = builtins.concatStringsSep "." (prefix ++ [ n ]); in
      if isOption o then checked name o (if set ? ${n} then set.${n} else o.default)
      else fill (prefix ++ [ n ]) o (set.${n} or { })
    ) opts;

  module = import ../module.nix {
    inherit lib pkgs;
    inherit (lib) utils;
    config.services.blixard = cfg;
  };
  opts = module.options.services.blixard;
  cfg = fill [ ] opts settings;

  expected = [
    "enable" "package" "dataDir" "listen" "relay" "resources.cpus" "resources.memoryMiB"
    "resources.diskGiB" "labels" "joinTicketFile" "init" "backend" "configFile" "extraFlags"
    "openFirewall"
  ];
  declared = map (o: builtins.concatStringsSep "." o.path) (flatten [ ] opts);
  missing = filter (n: !(builtins.elem n declared)) expected;
  unknownSettings = filter (n: !(opts ? ${n})) (attrNames settings);

  # Pushes mkIf down: drops attributes whose condition is false.
  isIf = v: isAttrs v && (v._type or null) == "if";
  resolve =
    v:
    if isIf v then
      (if v.condition then resolve v.content else { })
    else if isAttrs v && (v.type or null) != "derivation" then
      builtins.mapAttrs (_: resolve) (removeAttrs v (filter (n: isIf v.${n} && !v.${n}.condition) (attrNames v)))
    else if builtins.isList v then
      map resolve v
    else
      v;

  config = resolve module.config;
  failed = filter (a: !a.assertion) (config.assertions or [ ]);
  service = config.systemd.services.blixard or { };
  # The module must use packaging/systemd/blixard-start as its wrapper, unchanged.
  wrapperText = builtins.readFile ../../packaging/systemd/blixard-start;
  wrapper = pkgs.writeShellScript "blixard-start" wrapperText;

  # ExecStart back to an argv: `PROGRAM "arg" "arg" ...` with `$`/`%` doubled (NixOS'
  # utils.escapeSystemdExecArgs). Good enough for test values without double quotes.
  execStart = service.serviceConfig.ExecStart or "";
  execParts = builtins.split " " execStart;
  execProgram = builtins.head execParts;
  execRest = builtins.substring (builtins.stringLength execProgram + 1) (builtins.stringLength execStart) execStart;
  execArgv =
    if execStart == "" then [ ]
    else [ execProgram ] ++ builtins.fromJSON ("[" + builtins.replaceStrings [ "\" \"" "$$" "%%" ] [ "\",\"" "$" "%" ] execRest + "]");
in
if missing != [ ] then
  throw "module.nix does not declare: ${builtins.concatStringsSep ", " missing}"
else if unknownSettings != [ ] then
  throw "module-eval: settings name unknown options: ${builtins.concatStringsSep ", " unknownSettings}"
else if config != { } && execProgram != wrapper.outPath then
  throw "ExecStart does not start with the blixard-start wrapper from packaging/systemd: ${execStart}"
else if failed != [ ] then
  throw "module assertion failed: ${(builtins.head failed).message}"
else
  {
    options = declared;
    optionTypes = listToAttrs (map (o: { name = builtins.concatStringsSep "." o.path; value = o.option.type.name; }) (flatten [ ] opts));
    enabled = cfg.enable;
    inherit service;
    users = config.users or { };
    firewallUDP = config.networking.firewall.allowedUDPPorts or [ ];
    tmpfiles = config.systemd.tmpfiles.rules or [ ];
    inherit execArgv;
    # check.sh writes this script to wrapperPath before running execArgv.
    wrapperPath = wrapper.outPath;
    inherit wrapperText;
  }
