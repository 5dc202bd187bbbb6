"""The Litestar service and the embedlift CLI."""
