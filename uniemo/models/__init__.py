"""Models: pure ``nn.Module``s with named outputs; no distributed code, no file I/O in forwards."""
