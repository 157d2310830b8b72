"""cifar-lightning: the robustness study of a CIFAR-10 classifier. ``evaluate`` runs it from Python."""


def __getattr__(name: str):
    # Imported on first use: `import cifar_lightning.data` should not load Lightning, the attacks and the study.
    if name == "evaluate":
        from cifar_lightning.api import evaluate

        return evaluate
    raise AttributeError(f"module 'cifar_lightning' has no attribute {name!r}")
