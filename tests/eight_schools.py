"""Rubin's (1981) eight schools data, as in posteriordb's ``eight_schools`` (backend-free).

Both backends' tests build the centered model from it with
``POSTERIORDB_MODELS["eight_schools-eight_schools_centered"](EIGHT_SCHOOLS)``, which returns
``(model, (y, sigma), {})``, so they need no copy of the model.
"""

EIGHT_SCHOOLS = {
    "J": 8,
    "y": [28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0],
    "sigma": [15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0],
}
CENTERED = "eight_schools-eight_schools_centered"
