from mote_local.cli.commands import main

main(prog_name="mote")
