"""The VirtualMachine API: CRDs, the controller that keeps a VM pod per VM, and the vmctl CLI."""
