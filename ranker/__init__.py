"""apexrank's model, scoring policy and API: everything between raw audio and a ranked feed."""

__version__ = "0.1.0"
