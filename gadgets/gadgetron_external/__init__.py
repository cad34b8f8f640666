"""Gadgetron integration: targets for external Python gadgets (`<execute
name="gadgets.gadgetron_external.targets" target=...>`), the ReconData adapter, and the
persistent worker for `<external><connect>` (`pisf gadgetron-worker`)."""
