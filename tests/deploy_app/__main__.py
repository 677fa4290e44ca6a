"""``python tests/deploy_app``: the App SDK's layout of an application folder (what a MAP runs)."""

from app import SpleenSegApp

if __name__ == "__main__":
    SpleenSegApp().run()
