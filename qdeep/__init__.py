"""qdeep: cluster-scale training for aerial and satellite image analysis.

The package mirrors the pipeline: data -> models -> train -> tune -> cluster -> tracking/report -> cli.
"""

__version__ = "0.1.0"
