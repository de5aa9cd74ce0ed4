//! The admission rules, one test per rule.

use super::*;

const MIB: u64 = 1 << 20;

fn ask(max_new_tokens: usize) -> LocalAsk {
    LocalAsk {
        prompt_tokens: 100,
        max_new_tokens,
        time_left: None,
        on_deadline: OnDeadline::Shorten,
    }
}

fn calm() -> Board {
    Board {
        admit_local: true,
        local_paused: false,
        memory_pressure: false,
        battery_critical: false,
        prefer_cloud: false,
        battery_percent: None,
        temperature_c: Some(50.0),
        retry_after_ms: None,
        memory_budget: 1024 * MIB,
    }
}

fn hot() -> Board {
    Board {
        admit_local: false,
        local_paused: true,
        temperature_c: Some(86.0),
        retry_after_ms: Some(30_000),
        ..calm()
    }
}

fn limits(board: Option<Board>) -> Limits<'static> {
    Limits {
        board,
        hot_action: HotAction::Refuse,
        speed: None,
        kv: None,
        memory_budget: 1024 * MIB,
        reserved: &[],
    }
}

/// 1 MiB per token, 500 MiB of weights, two slots.
fn kv() -> KvModel {
    KvModel {
        base: 500 * MIB,
        per_token: MIB,
        slots: 2,
    }
}

/// First token after 1 s, then 10 tokens/s.
fn speed() -> LocalSpeed {
    LocalSpeed {
        ttft: Duration::from_secs(1),
        tokens_per_s: 10.0,
    }
}

#[test]
fn rule_1_a_board_that_admits_local_work_lets_it_start() {
    let a = admit(&ask(50), &limits(Some(calm()))).unwrap();
    assert_eq!(
        a,
        Admitted {
            max_new_tokens: 50,
            shortened: false,
            kv_bytes: 0
        }
    );
}

#[test]
fn rule_1_ungoverned_work_always_starts() {
    assert!(admit(&ask(50), &limits(None)).is_ok());
}

#[test]
fn rule_1_a_hot_board_refuses_with_its_temperature_and_retry_hint() {
    assert_eq!(
        admit(&ask(50), &limits(Some(hot()))),
        Err(Refusal::TooHot {
            temperature_c: Some(86.0),
            retry_after_ms: Some(30_000)
        })
    );
}

#[test]
fn rule_1_a_hot_board_holds_work_when_the_hot_action_is_queue() {
    let l = Limits {
        hot_action: HotAction::Queue,
        ..limits(Some(hot()))
    };
    assert!(admit(&ask(50), &l).is_ok());
}

#[test]
fn rule_1_a_hot_board_short_of_memory_refuses_even_with_queue() {
    let b = Board {
        memory_pressure: true,
        ..hot()
    };
    let l = Limits {
        hot_action: HotAction::Queue,
        ..limits(Some(b))
    };
    assert!(matches!(admit(&ask(50), &l), Err(Refusal::TooHot { .. })));
}

#[test]
fn rule_1_memory_pressure_refuses_new_local_work() {
    let b = Board {
        admit_local: false,
        memory_pressure: true,
        retry_after_ms: Some(5000),
        ..calm()
    };
    assert_eq!(
        admit(&ask(50), &limits(Some(b))),
        Err(Refusal::ShortOfMemory {
            retry_after_ms: Some(5000)
        })
    );
}

#[test]
fn rule_1_a_critical_battery_refuses_local_work_even_with_queue() {
    let b = Board {
        admit_local: false,
        local_paused: true,
        battery_critical: true,
        battery_percent: Some(4.0),
        retry_after_ms: Some(60_000),
        ..calm()
    };
    let l = Limits {
        hot_action: HotAction::Queue,
        ..limits(Some(b))
    };
    assert!(matches!(admit(&ask(50), &l), Err(Refusal::TooHot { .. })));
    let cool = Board {
        local_paused: false,
        ..b
    };
    assert_eq!(
        admit(&ask(50), &limits(Some(cool))),
        Err(Refusal::BatteryCritical {
            battery_percent: Some(4.0),
            retry_after_ms: Some(60_000)
        })
    );
}

#[test]
fn rule_2_no_measured_speed_means_no_fitting() {
    let a = LocalAsk {
        time_left: Some(Duration::from_millis(1)),
        on_deadline: OnDeadline::Refuse,
        ..ask(500)
    };
    assert_eq!(admit(&a, &limits(None)).unwrap().max_new_tokens, 500);
}

#[test]
fn rule_2_a_deadline_that_leaves_enough_time_keeps_max_tokens() {
    // 1 s + 49 tokens / 10 per s = 5.9 s.
    let a = LocalAsk {
        time_left: Some(Duration::from_secs(6)),
        ..ask(50)
    };
    let l = Limits {
        speed: Some(speed()),
        ..limits(None)
    };
    let r = admit(&a, &l).unwrap();
    assert_eq!((r.max_new_tokens, r.shortened), (50, false));
}

#[test]
fn rule_2_a_short_deadline_shortens_to_what_fits() {
    // 3 s left: the first token at 1 s, then 2 s x 10 tokens/s.
    let a = LocalAsk {
        time_left: Some(Duration::from_secs(3)),
        ..ask(50)
    };
    let l = Limits {
        speed: Some(speed()),
        ..limits(None)
    };
    let r = admit(&a, &l).unwrap();
    assert_eq!((r.max_new_tokens, r.shortened), (21, true));
}

#[test]
fn rule_2_shortening_keeps_at_least_one_token() {
    let a = LocalAsk {
        time_left: Some(Duration::from_millis(10)),
        ..ask(50)
    };
    let l = Limits {
        speed: Some(speed()),
        ..limits(None)
    };
    assert_eq!(admit(&a, &l).unwrap().max_new_tokens, 1);
}

#[test]
fn rule_2_a_short_deadline_refuses_when_the_request_asks_so() {
    let a = LocalAsk {
        time_left: Some(Duration::from_secs(3)),
        on_deadline: OnDeadline::Refuse,
        ..ask(50)
    };
    let l = Limits {
        speed: Some(speed()),
        ..limits(None)
    };
    assert_eq!(
        admit(&a, &l),
        Err(Refusal::DeadlineTooShort {
            tokens: 50,
            needed: Duration::from_millis(5900),
            speed: speed(),
            left: Duration::from_secs(3)
        })
    );
}

#[test]
fn rule_3_the_kv_reservation_counts_prompt_and_shortened_generation() {
    let a = LocalAsk {
        time_left: Some(Duration::from_secs(3)),
        ..ask(50)
    };
    let l = Limits {
        speed: Some(speed()),
        kv: Some(kv()),
        ..limits(None)
    };
    assert_eq!(admit(&a, &l).unwrap().kv_bytes, (100 + 21) * MIB);
}

#[test]
fn rule_3_kv_over_budget_beside_work_in_flight_is_worth_a_retry() {
    // 500 + 300 (in flight) + 300 (new) > 1024 MiB, but 500 + 300 fits on an idle board.
    let l = Limits {
        kv: Some(kv()),
        reserved: &[300 * MIB],
        ..limits(None)
    };
    assert_eq!(
        admit(&ask(200), &l),
        Err(Refusal::KvOverBudget {
            tokens: 300,
            bytes: 300 * MIB,
            needed: 1100 * MIB,
            budget: 1024 * MIB,
            retryable: true
        })
    );
}

#[test]
fn rule_3_kv_that_never_fits_is_not_worth_a_retry() {
    let l = Limits {
        kv: Some(kv()),
        ..limits(None)
    };
    assert!(matches!(
        admit(&ask(600), &l),
        Err(Refusal::KvOverBudget {
            retryable: false,
            ..
        })
    ));
}

#[test]
fn rule_3_only_as_many_reservations_as_slots_count() {
    // Two slots: at worst two of the 200 MiB reservations run at once, 900 MiB with the weights; all four
    // together (1300 MiB) would be over the budget, but they cannot run together.
    let l = Limits {
        kv: Some(kv()),
        reserved: &[200 * MIB, 200 * MIB, 200 * MIB],
        ..limits(None)
    };
    assert!(admit(&ask(100), &l).is_ok());
}

#[test]
fn rule_3_the_governors_budget_replaces_the_configured_one() {
    // A cgroup limit of 600 MiB: 500 + 200 does not fit, though the configured 1024 MiB would take it.
    let b = Board {
        memory_budget: 600 * MIB,
        ..calm()
    };
    let l = Limits {
        kv: Some(kv()),
        ..limits(Some(b))
    };
    assert!(matches!(
        admit(&ask(100), &l),
        Err(Refusal::KvOverBudget {
            budget,
            ..
        }) if budget == 600 * MIB
    ));
    assert!(admit(&ask(100), &limits(None)).is_ok());
}
