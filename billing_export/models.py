"""Export runs to Stripe (see billing_export/services.py)."""
