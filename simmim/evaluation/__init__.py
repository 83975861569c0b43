"""What a model learned, measured: probes of frozen features (`probe`), the reconstruction evaluation
(`reconstruction`) with its metrics (`metrics`) and pictures (`grids`). The eval scripts are their command
lines."""
