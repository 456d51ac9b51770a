"""Sources, sinks, the block plan, devices, memory and execution. Knows no merge formula."""
