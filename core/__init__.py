"""Pieces every layer shares: settings, the embedded services, logging set-up."""
