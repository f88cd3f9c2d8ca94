"""The command-line tools' code and what they share (runner support, model builders, toy
data). ``tools/*.py`` and the tests import it; the library never does: ``import rest_mm``
imports nothing from here."""
