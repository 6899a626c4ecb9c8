"""Linear-probe evaluation shared by fine-tuning and the round monitor: data, heads, metrics, splits."""
