#!/usr/bin/env bash
# nix/check.sh: offline checks of the Nix files, the NixOS module and the systemd units.
#
# These machines have nix-bin 2.8 but no nixpkgs, no microvm.nix and no network, so
# nothing here builds the package or a guest. What is checked:
#   1. every .nix file of the repo parses (nix-instantiate --parse);
#   2. nix/module.nix, evaluated with a stub lib (nix/stub-lib.nix, nix/tests/module-eval.nix):
#      the expected options exist, defaults and settings pass their types, assertions hold
#      (and fail where they must), the generated service has the expected settings;
#   3. the start wrapper (packaging/systemd/blixard-start), run through the module's
#      ExecStart and the Debian unit's ExecStart with a fake blixard: --init / --join-file
#      only on first start;
#   4. `systemd-analyze verify` of packaging/systemd/blixard.service and of a unit rendered
#      from the module's serviceConfig (when systemd-analyze is installed), failing on any
#      warning, since verify exits 0 on unknown or unparsable settings.
# Exits non-zero on the first failure. Needs: nix-instantiate, jq; optional systemd-analyze.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
export NIX_CONFIG="build-users-group =
experimental-features = nix-command flakes"

fail() {
    echo "FAIL: $*" >&2
    exit 1
}
ok() { echo "ok   $*"; }

command -v nix-instantiate >/dev/null || fail "nix-instantiate not found (Debian: apt-get install -y nix-bin)"
command -v jq >/dev/null || fail "jq not found (Debian: apt-get install -y jq)"

T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT

# --- 1. parse ---------------------------------------------------------------------------
n=0
while IFS= read -r -d '' f; do
    nix-instantiate --parse "$f" >/dev/null 2>"$T/parse.err" || { cat "$T/parse.err" >&2; fail "parse $f"; }
    n=$((n + 1))
done < <(find . \( -path ./target -o -path ./.git -o -name 'target-*' \) -prune -o -name '*.nix' -print0)
[ "$n" -gt 0 ] || fail "no .nix files found"
ok "parsed $n .nix files"

# --- 2. module evaluation with the stub lib ---------------------------------------------
mkdir -p "$T/pkg/bin" "$T/scripts"
cat >"$T/pkg/bin/blixard" <<'EOF'
#!/bin/sh
# fake blixard: records its arguments, one per line
printf '%s\n' "$@" >"$BLIXARD_FAKE_OUT"
EOF
chmod +x "$T/pkg/bin/blixard"

# eval NAME SETTINGS: evaluates the module with SETTINGS, JSON to $T/NAME.json
eval_module() {
    nix-instantiate --eval --strict --json nix/tests/module-eval.nix \
        --arg settings "$2" --argstr fakePackage "$T/pkg" --argstr scriptsDir "$T/scripts" \
        >"$T/$1.json" 2>"$T/$1.err"
}
expect_eval() {
    eval_module "$1" "$2" || { cat "$T/$1.err" >&2; fail "module evaluation '$1'"; }
}
expect_eval_error() { # NAME SETTINGS MESSAGE-PART
    if eval_module "$1" "$2"; then fail "module evaluation '$1' should fail ($3)"; fi
    grep -q -- "$3" "$T/$1.err" || { cat "$T/$1.err" >&2; fail "module evaluation '$1' failed for another reason than: $3"; }
}
jqt() { # NAME FILTER: asserts that FILTER is true on $T/NAME.json
    jq -e "$2" "$T/$1.json" >/dev/null || fail "$1: expected $2"
}

expect_eval disabled '{ }'
jqt disabled '.enabled == false and .service == {}'
jqt disabled '.options | length == 15'
ok "module options: $(jq -r '.options | join(" ")' "$T/disabled.json")"
jqt disabled '.optionTypes.package == "package" and .optionTypes.backend == "nullOr" and .optionTypes.labels == "attrsOf"'

expect_eval defaults '{ enable = true; }'
jqt defaults '.service.serviceConfig.Type == "notify" and .service.serviceConfig.NotifyAccess == "main"'
jqt defaults '.service.serviceConfig.StateDirectory == "blixard" and .tmpfiles == []'
jqt defaults '.service.serviceConfig.DevicePolicy == "closed" and .service.serviceConfig.DeviceAllow == ["/dev/kvm rw", "/dev/net/tun rw"]'
jqt defaults '.service.serviceConfig.ProtectSystem == "strict" and .service.serviceConfig.ReadWritePaths == ["/var/lib/blixard"]'
jqt defaults '.service.serviceConfig.AmbientCapabilities == ["CAP_NET_ADMIN"] and .service.serviceConfig.CapabilityBoundingSet == ["CAP_NET_ADMIN"]'
jqt defaults '.service.serviceConfig.RestrictAddressFamilies == ["AF_UNIX","AF_INET","AF_INET6","AF_NETLINK"]'
jqt defaults '.service.serviceConfig.Restart == "on-failure" and .service.serviceConfig.KillSignal == "SIGTERM"'
jq -e --arg pkg "$T/pkg" '.execArgv[1:] == [$pkg + "/bin/blixard", "--data-dir", "/var/lib/blixard", "node", "run"]' "$T/defaults.json" >/dev/null ||
    fail "defaults: ExecStart is $(jq -c .execArgv "$T/defaults.json")"
jqt defaults '.service.environment == {} and .firewallUDP == []'
jqt defaults '.users.users.blixard.isSystemUser and .users.users.blixard.extraGroups == ["kvm"]'
ok "module: enable = true gives a Type=notify, hardened service running 'blixard --data-dir /var/lib/blixard node run'"

D_JOIN="$T/data-join"
expect_eval join "{ enable = true; dataDir = \"$D_JOIN\"; listen = \"10.0.0.2:7000\"; openFirewall = true;
    relay = \"https://relay.example.org\"; resources = { cpus = 2; memoryMiB = 2048; diskGiB = 20; };
    labels = { zone = \"a\"; rack = \"r1\"; }; joinTicketFile = \"$T/join.ticket\"; configFile = \"/etc/blixard.toml\";
    extraFlags = [ \"--label\" \"note=a b\$c%d\" ]; }"
jq -e --arg pkg "$T/pkg" --arg d "$D_JOIN" '.execArgv[1:] == [$pkg + "/bin/blixard", "--data-dir", $d, "node", "run",
    "--config", "/etc/blixard.toml", "--listen", "10.0.0.2:7000", "--relay", "https://relay.example.org",
    "--cpus", "2", "--memory-mib", "2048", "--disk-gib", "20", "--label", "rack=r1", "--label", "zone=a",
    "--label", "note=a b$c%d"]' "$T/join.json" >/dev/null || fail "join: ExecStart is $(jq -c .execArgv "$T/join.json")"
jq -e --arg t "$T/join.ticket" '.service.environment == { BLIXARD_JOIN_TICKET_FILE: $t }' "$T/join.json" >/dev/null ||
    fail "join: environment is $(jq -c .service.environment "$T/join.json")"
jqt join '.firewallUDP == [7000]'
jq -e --arg d "$D_JOIN" '.tmpfiles == ["d " + $d + " 0700 blixard blixard - -"] and (.service.serviceConfig | has("StateDirectory") | not)
    and .service.serviceConfig.ReadWritePaths == [$d]' "$T/join.json" >/dev/null || fail "join: data dir outside /var/lib"
jqt join '(.execArgv | index("--join-file")) == null'
ok "module: every option reaches its flag; the ticket file is passed by path (BLIXARD_JOIN_TICKET_FILE), never inline"

D_INIT="$T/data-init"
expect_eval init "{ enable = true; dataDir = \"$D_INIT\"; init = true; listen = \"[fd00::1]:7001\"; openFirewall = true; backend = \"qemu\"; }"
jqt init '.service.environment == { BLIXARD_INIT: "1" } and .firewallUDP == [7001]'
jqt init '.execArgv[-2:] == ["--backend", "qemu"] and (.execArgv | index("--init")) == null'
ok "module: init = true sets BLIXARD_INIT=1 (the wrapper adds --init on first start); IPv6 listen port parsed"

expect_eval_error both '{ enable = true; init = true; joinTicketFile = "/etc/t"; }' "either init"
expect_eval_error fw '{ enable = true; openFirewall = true; }' "openFirewall needs"
expect_eval_error literal '{ enable = true; joinTicketFile = ./check.sh; }' "not a Nix path literal"
expect_eval_error reldir '{ enable = true; dataDir = "var/blixard"; }' "absolute path"
expect_eval_error cpus '{ enable = true; resources = { cpus = "two"; }; }' "resources.cpus: value does not match"
expect_eval_error zero '{ enable = true; resources = { memoryMiB = 0; }; }' "resources.memoryMiB: value does not match"
expect_eval_error label '{ enable = true; labels = { zone = 1; }; }' "labels: value does not match"
expect_eval_error backend '{ enable = true; backend = "firecracker"; }' "backend: value does not match"
expect_eval_error unknown '{ enable = true; ticket = "blixard..."; }' "unknown options: ticket"
ok "module: refuses init+join, openFirewall without a port, a ticket path literal, a relative dataDir, ill-typed values, unknown options"

# --- 3. the start wrapper, through both ExecStart lines ---------------------------------
wrapper=$(jq -r .wrapperPath "$T/join.json")
jq -j .wrapperText "$T/join.json" >"$wrapper"
chmod +x "$wrapper"
cmp -s "$wrapper" packaging/systemd/blixard-start || fail "the module's wrapper differs from packaging/systemd/blixard-start"
sh -n packaging/systemd/blixard-start || fail "sh -n packaging/systemd/blixard-start"
if command -v shellcheck >/dev/null; then
    shellcheck -s sh packaging/systemd/blixard-start || fail "shellcheck packaging/systemd/blixard-start"
    ok "shellcheck packaging/systemd/blixard-start"
fi

# run_module NAME [ENV...]: runs the module's ExecStart of eval NAME, args to $T/out
run_module() {
    local name=$1
    shift
    local argv=()
    mapfile -t argv < <(jq -r '.execArgv[]' "$T/$name.json")
    rm -f "$T/out"
    env BLIXARD_FAKE_OUT="$T/out" "$@" "${argv[@]}" 2>"$T/stderr"
}
args() { tr '\n' ' ' <"$T/out"; }
has_args() { # WANTED: the recorded args end with WANTED
    local a
    a=$(args)
    case "$a" in *"$1 ") ;; *) fail "expected args ending in '$1', got '$a'" ;; esac
}
no_arg() {
    if grep -qx -- "$1" "$T/out"; then fail "unexpected $1 in: $(args)"; fi
}

printf '  blixardTESTTICKET\r\n' >"$T/join.ticket"
run_module join BLIXARD_JOIN_TICKET_FILE="$T/join.ticket" || { cat "$T/stderr" >&2; fail "module ExecStart, first start"; }
has_args "--label note=a b\$c%d --join-file $T/join.ticket"
mkdir -p "$D_JOIN" && : >"$D_JOIN/raft.redb"
run_module join BLIXARD_JOIN_TICKET_FILE="$T/join.ticket" || fail "module ExecStart, restart"
no_arg --join-file
rm -f "$T/join.ticket"
run_module join BLIXARD_JOIN_TICKET_FILE="$T/join.ticket" || fail "module ExecStart, restart after the ticket file was deleted"
no_arg --join-file
rm -f "$D_JOIN/raft.redb"
if run_module join BLIXARD_JOIN_TICKET_FILE="$T/join.ticket"; then fail "first start with a missing ticket file should fail"; fi
grep -q "cannot read the join ticket file" "$T/stderr" || fail "missing ticket file: $(cat "$T/stderr")"
: >"$T/join.ticket"
if run_module join BLIXARD_JOIN_TICKET_FILE="$T/join.ticket"; then fail "first start with an empty ticket file should fail"; fi
grep -q "is empty" "$T/stderr" || fail "empty ticket file: $(cat "$T/stderr")"
ok "wrapper (module ExecStart): --join-file on first start only; missing or empty ticket file refused"

run_module init BLIXARD_INIT=1 || fail "module ExecStart, init"
has_args "--backend qemu --init"
mkdir -p "$D_INIT" && : >"$D_INIT/raft.redb"
run_module init BLIXARD_INIT=1 || fail "module ExecStart, init restart"
no_arg --init
rm -f "$D_INIT/raft.redb"
if run_module init BLIXARD_INIT=1 BLIXARD_JOIN_TICKET_FILE=/x; then fail "first start with both BLIXARD_INIT=1 and a ticket file should fail"; fi
grep -q "either creates a cluster or joins one" "$T/stderr" || fail "init+join: $(cat "$T/stderr")"
ok "wrapper (module ExecStart): --init on first start only; init together with a ticket refused"

# The Debian unit's ExecStart, with its paths pointed at the fake binary and a temp data dir.
exec_line=$(sed -n 's/^ExecStart=//p' packaging/systemd/blixard.service)
[ "$(printf '%s\n' "$exec_line" | wc -l)" = 1 ] || fail "blixard.service: expected one ExecStart"
D_DEB="$T/data-deb"
read -r -a deb_argv <<<"$exec_line"
[ "${deb_argv[0]}" = /usr/local/lib/blixard/blixard-start ] || fail "blixard.service: ExecStart does not run /usr/local/lib/blixard/blixard-start"
[ "${deb_argv[1]}" = /usr/local/bin/blixard ] || fail "blixard.service: ExecStart does not run /usr/local/bin/blixard"
run_deb() { # FLAGS [ENV...]: emulates systemd's $BLIXARD_FLAGS word splitting
    local flags=$1
    shift
    local argv=() w
    for w in "${deb_argv[@]}"; do
        case "$w" in
            /usr/local/lib/blixard/blixard-start) argv+=("$repo/packaging/systemd/blixard-start") ;;
            /usr/local/bin/blixard) argv+=("$T/pkg/bin/blixard") ;;
            /var/lib/blixard) argv+=("$D_DEB") ;;
            '$BLIXARD_FLAGS') read -r -a fl <<<"$flags" && argv+=("${fl[@]}") ;;
            *) argv+=("$w") ;;
        esac
    done
    rm -f "$T/out"
    env BLIXARD_FAKE_OUT="$T/out" "$@" "${argv[@]}" 2>"$T/stderr"
}
printf 'blixardDEBTICKET\n' >"$T/deb.ticket"
run_deb "--listen 10.0.0.3:7000  --label zone=b" BLIXARD_JOIN_TICKET_FILE="$T/deb.ticket" || fail "Debian ExecStart, first start"
[ "$(args)" = "--data-dir $D_DEB node run --listen 10.0.0.3:7000 --label zone=b --join-file $T/deb.ticket " ] || fail "Debian ExecStart: $(args)"
mkdir -p "$D_DEB" && : >"$D_DEB/raft.redb"
run_deb "" BLIXARD_JOIN_TICKET_FILE="$T/deb.ticket" || fail "Debian ExecStart, restart"
[ "$(args)" = "--data-dir $D_DEB node run " ] || fail "Debian ExecStart restart: $(args)"
ok "wrapper (Debian ExecStart): '$exec_line' -> --join-file on first start only"

# --- 4. systemd-analyze verify ----------------------------------------------------------
if ! command -v systemd-analyze >/dev/null; then
    echo "SKIP systemd-analyze verify: systemd-analyze not installed (Debian: apt-get install -y systemd)"
    exit 0
fi
[ -d /usr/lib/systemd/system ] || [ -d /lib/systemd/system ] || fail "systemd-analyze exists but the system's unit directory does not"
# A throw-away root: the system's own units (for the targets the units name), dummy
# executables at the paths ExecStart names, and the unit files under test.
R="$T/root"
mkdir -p "$R/usr/lib/systemd" "$R/etc/systemd/system" "$R/usr/local/bin" "$R/usr/local/lib/blixard"
cp -a "$(readlink -f /usr/lib/systemd/system 2>/dev/null || echo /lib/systemd/system)" "$R/usr/lib/systemd/system"
printf '#!/bin/sh\nexit 0\n' >"$R/usr/local/bin/blixard"
chmod +x "$R/usr/local/bin/blixard"
cp packaging/systemd/blixard-start "$R/usr/local/lib/blixard/"
cp packaging/systemd/blixard.service "$R/etc/systemd/system/"

# The module's service as a unit file (NixOS renders lists as one line per item).
jq -r '
  def v: if type == "boolean" then (if . then "yes" else "no" end) else tostring end;
  def lines(f): to_entries[] | .key as $k | (.value | if type == "array" then .[] else . end) | "\($k)=\(v)";
  .service as $s
  | "[Unit]", "Description=\($s.description)",
    ($s.wants[] | "Wants=\(.)"), ($s.after[] | "After=\(.)"),
    "StartLimitIntervalSec=\($s.startLimitIntervalSec)", "StartLimitBurst=\($s.startLimitBurst)",
    "", "[Service]",
    ($s.environment | to_entries[] | "Environment=\"\(.key)=\(.value)\""),
    ($s.serviceConfig | lines(.)),
    "", "[Install]", ($s.wantedBy[] | "WantedBy=\(.)")' "$T/join.json" >"$R/etc/systemd/system/blixard-nixos.service"
mkdir -p "$R$T/scripts" "$R$T/pkg/bin"
cp "$wrapper" "$R$wrapper"
cp "$T/pkg/bin/blixard" "$R$T/pkg/bin/"

for unit in blixard.service blixard-nixos.service; do
    # verify exits 0 on unknown or unparsable settings: any output is a failure.
    if ! systemd-analyze verify --man=no --root="$R" "$unit" >"$T/verify.out" 2>&1 || [ -s "$T/verify.out" ]; then
        cat "$T/verify.out" >&2
        fail "systemd-analyze verify $unit"
    fi
done
ok "systemd-analyze verify (systemd $(systemd-analyze --version | sed -n '1s/^systemd \([0-9]*\).*/\1/p')): packaging/systemd/blixard.service and the module's service, no warnings"
echo "all checks passed"
