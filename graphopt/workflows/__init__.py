"""What users call: optimize, save/load, partition, distill, analyze, the distributed pipeline runner."""
