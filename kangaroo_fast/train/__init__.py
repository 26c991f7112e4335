"""Adapter training: offline data, teacher features, distillation (``kangaroo-fast train``)."""
