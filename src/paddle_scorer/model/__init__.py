"""From a folder to a loaded model: paths and folder checks, tensor layouts, the model libraries, adapter checks,
device/dtype policy, the one memory rule, the load plan (every check before paddle sees a tensor), the loader."""
