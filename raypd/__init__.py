"""raypd: distributed hyperparameter tuning on Ray for a preference-dynamics inverse problem."""

__version__ = "0.1.0"
