from dockermirror.cli import main

raise SystemExit(main())
