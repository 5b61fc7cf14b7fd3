"""edgemm.runtime: the device side. Reads bundles and runs them; never imports torch."""
