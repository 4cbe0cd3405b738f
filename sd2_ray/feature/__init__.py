"""Feature-level drafters (EAGLE family, with FSPAD's two components): a small head that reads the
target's hidden features instead of running a standalone draft model. Pure torch; no Ray here."""
