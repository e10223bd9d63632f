"""MLflow tracking: the run hierarchy (scenario run → task runs → candidate runs), artifacts and
plots, the packed model as a registered pyfunc model. Only this package imports MLflow, and only
when tracking is on; a failing tracking server costs warnings, never the run."""
