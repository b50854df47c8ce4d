"""MarrowScope: deep-learning reading of bone-marrow smears (Eckardt et al., Leukemia 2022).

Importing the package is cheap: heavy dependencies (torch, mlflow, grpc) are imported
by the submodules that need them.
"""

__version__ = "0.1.0"
