"""Pure torch / transformers / torchvision code: no Prefect, no MLflow, no config objects."""
