"""The routing service: the Open Inference Protocol over HTTP, dynamic batching onto a routing backend."""
