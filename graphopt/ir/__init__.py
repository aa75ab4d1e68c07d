"""The IR: capture to a functional ATen torch.fx graph, graph queries, dynamic shapes, verification."""
