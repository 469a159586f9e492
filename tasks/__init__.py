"""One job per module, typed inputs and outputs, no hidden globals."""
