"""`mesh-proxy`: the process that wires the data path (proxy/) to the control plane (mesh/).
It sits above both; neither imports it."""
