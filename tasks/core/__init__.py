"""Infrastructure every stage uses: settings base, MLflow tracking, fingerprints, stop signals, the work-dir lock,
Prefect."""
