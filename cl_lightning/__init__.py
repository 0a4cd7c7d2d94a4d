"""cl_lightning: continual learning on PyTorch Lightning, built around MC-SGD."""
