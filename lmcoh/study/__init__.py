"""`lmcoh study`: the paper's claims checked on exact numbers (`claims`) and the report
written from them (`report`)."""
