"""The hematologist's review app (`/review`): reviewer accounts and sessions (`accounts`),
a case's cells, corrections and sign-out (`cases`), and the pages (`router`, templates and
static files beside it)."""
