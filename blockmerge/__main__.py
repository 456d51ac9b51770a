"""`python -m blockmerge` (and the `blockmerge` command) runs the command line."""

from blockmerge import interrupts


def run() -> None:
    """The command line, with Ctrl-C handled from the first import on (see `interrupts`)."""
    interrupts.leave_on_interrupt()
    try:
        from blockmerge.engine import memory

        memory.return_freed_blocks_to_the_os()  # this process is the command's: its allocator is set up once
        from blockmerge.cli import main

        main()
    except KeyboardInterrupt:
        interrupts.leave()
    except SystemExit as done:
        if done.code == 130:
            interrupts.leave()  # interrupted: the interpreter's exit is skipped, a Ctrl-C could kill it midway
        raise
    finally:
        interrupts.leave_on_interrupt()


if __name__ == "__main__":
    run()
