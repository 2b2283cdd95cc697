from zolm.cli import main

raise SystemExit(main())
