from lmops.cli import app

app(prog_name="lmops")
