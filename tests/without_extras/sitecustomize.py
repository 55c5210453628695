"""Put on PYTHONPATH by tests: Python as on a GPU image that lacks fire, termcolor and nltk. Their copies in this
interpreter's site-packages cannot be imported; copies elsewhere on sys.path (installed from wheels) can."""
import importlib.machinery
import site
import sys

HIDDEN = {"fire", "termcolor", "nltk"}
SITE_PACKAGES = tuple(site.getsitepackages() + [site.getusersitepackages()])


class HideInstalledCopies:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name.partition(".")[0] not in HIDDEN:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or (spec.origin or "").startswith(SITE_PACKAGES):
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by tests/without_extras)", name=name)
        return spec


sys.meta_path.insert(0, HideInstalledCopies())
