"""Developer benchmarks, outside the workbook's package: ``python -m benchmarks.bench harvest|train``
(harvest speed against a bare forward pass; one training step of our trainer against SAELens and sparsify)."""
