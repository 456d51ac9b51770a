"""Statistics of models over data (Fisher, Gram matrices, trimmed task vectors), written to the store."""
