"""Stage 5, results: evaluation (accuracy and representation bias), the paper-form table,
results.json and plots, and the deployable bundle."""
