from hostagent.cli import main

main()
