# Example guest run by qemu (microvm.nix's `qemu` runner). Build the runner:
#   nix build .#microvm-qemu
# (= nixosConfigurations.blixard-guest-qemu.config.microvm.declaredRunner)
{
  imports = [ ./guest.nix ];
  networking.hostName = "blixard-guest-qemu";
  microvm.hypervisor = "qemu";
}
