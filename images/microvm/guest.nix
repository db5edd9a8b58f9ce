# A tiny NixOS guest for microvm.nix, shared by the example runners (qemu.nix,
# cloud-hypervisor.nix). Import it together with microvm.nixosModules.microvm.
#
# - No password (root is locked), no SSH, no keys: nothing secret in the image.
# - The guest's /nix/store is an erofs disk built into the runner (no share of the host's
#   store), so the runner's closure is self-contained and can be copied to other hosts.
# - No network interface: add one when the node's networking is ready, e.g.
#     microvm.interfaces = [ { type = "tap"; id = "vm-demo"; mac = "02:00:00:00:00:01"; } ];
# - When the guest's userspace is up it prints the readiness marker on the serial console
#   (console=ttyS0 with both qemu and cloud-hypervisor on x86_64).
{ lib, pkgs, ... }:

let
  readyMarker = "BLIXARD-GUEST-READY";
in
{
  system.stateVersion = lib.trivial.release;

  microvm = {
    vcpu = lib.mkDefault 1;
    mem = lib.mkDefault 256;
    shares = [ ];
    storeOnDisk = true;
    storeDiskType = "erofs";
    interfaces = lib.mkDefault [ ];
    # QMP / API socket, relative to the directory the runner is started in.
    socket = "control.socket";
  };

  networking.hostName = lib.mkDefault "blixard-guest";

  users.mutableUsers = false;
  # Locked: no password login on the console or anywhere else.
  users.users.root.hashedPassword = "!";
  services.openssh.enable = false;

  systemd.services.blixard-ready = {
    description = "Print the Blixard readiness marker on the console";
    wantedBy = [ "multi-user.target" ];
    serviceConfig = {
      Type = "oneshot";
      RemainAfterExit = true;
      StandardOutput = "journal+console";
      ExecStart = "${pkgs.coreutils}/bin/echo ${readyMarker}";
    };
  };

  documentation.enable = false;
}
