from eclm_lab.report import newcomer_ratios


def entry(warm, alone):
    return {"samples_warm": warm, "samples_alone": alone}


def test_a_warm_start_that_never_reaches_the_mark_is_not_left_out():
    ratios = newcomer_ratios(
        {"rotate": entry(None, 96), "contrast": entry(40, 80), "noise": entry(0, 0)}
    )
    # noise needed no labels alone, so it says nothing; rotate failed and shows it
    assert ratios == {"rotate": None, "contrast": 0.5}
