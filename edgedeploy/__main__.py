from edgedeploy.cli import app

app(prog_name="deploy")
