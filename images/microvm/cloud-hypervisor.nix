# Example guest run by Cloud Hypervisor (microvm.nix's `cloud-hypervisor` runner). Needs
# KVM on the host. Build the runner:
#   nix build .#microvm-cloud-hypervisor
# (= nixosConfigurations.blixard-guest-cloud-hypervisor.config.microvm.declaredRunner)
{
  imports = [ ./guest.nix ];
  networking.hostName = "blixard-guest-cloud-hypervisor";
  microvm.hypervisor = "cloud-hypervisor";
}
