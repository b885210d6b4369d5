//! `sampling::sample`: each token drawn with its softmax probability after the filter and the
//! temperature, the same seed giving the same draws, and draws that a small change of the
//! logits rarely moves.

use ndarray::Array1;
use performer_models::sampling::{sample, softmax};
use performer_models::{Filter, GenerateOptions};
use performer_tensor::rng::Generator;

/// How often each token comes out of `draws` samples of `logits`, one generator for all.
fn frequencies(logits: &Array1<f32>, opts: &GenerateOptions, draws: usize) -> Vec<f64> {
    let mut g = Generator::seeded(11);
    let mut counts = vec![0usize; logits.len()];
    for _ in 0..draws {
        let t = sample(&logits.view(), opts, &mut g).unwrap();
        counts[t as usize] += 1;
    }
    counts.iter().map(|&c| c as f64 / draws as f64).collect()
}

/// Asserts every frequency within five standard errors of its probability.
fn assert_frequencies(got: &[f64], want: &[f64], draws: usize) {
    assert_eq!(got.len(), want.len());
    for (i, (&f, &p)) in got.iter().zip(want).enumerate() {
        let se = (p * (1.0 - p) / draws as f64).sqrt();
        assert!(
            (f - p).abs() <= 5.0 * se + 1e-12,
            "token {i}: frequency {f}, probability {p} (got {got:?})"
        );
    }
}

#[test]
fn each_token_is_drawn_with_its_softmax_probability() {
    const DRAWS: usize = 40_000;
    // Probabilities 0.4, 0.3, 0.2, 0.1 and one impossible token.
    let p = [0.4f32, 0.3, 0.2, 0.1];
    let logits = Array1::from_iter(p.iter().map(|q| q.ln() + 1.5).chain([f32::NEG_INFINITY]));
    let none = GenerateOptions {
        filter: Filter::None,
        ..Default::default()
    };
    let want: Vec<f64> = p.iter().map(|&q| q as f64).chain([0.0]).collect();
    assert_frequencies(&frequencies(&logits, &none, DRAWS), &want, DRAWS);
    // Temperature 2 samples the square roots' softmax.
    let hot = GenerateOptions {
        temperature: 2.0,
        ..none.clone()
    };
    let want: Vec<f64> = softmax(&(&logits / 2.0).view())
        .iter()
        .map(|&q| q as f64)
        .collect();
    assert!((want[0] - 0.3254).abs() < 1e-4, "{want:?}");
    assert_frequencies(&frequencies(&logits, &hot, DRAWS), &want, DRAWS);
    // Top-k over 10 tokens keeps 1 at thres 0.9, 5 at 0.5: the rest are never drawn.
    let ten = Array1::from_iter((0..10).map(|i| (i as f32 * 0.37).sin()));
    let half = GenerateOptions {
        filter: Filter::TopK { thres: 0.5 },
        ..Default::default()
    };
    let kept = performer_models::sampling::top_k(&ten.view(), 0.5);
    let want: Vec<f64> = softmax(&kept.view()).iter().map(|&q| q as f64).collect();
    assert_eq!(want.iter().filter(|&&q| q > 0.0).count(), 5);
    assert_frequencies(&frequencies(&ten, &half, DRAWS), &want, DRAWS);
}

#[test]
fn the_same_seed_gives_the_same_draws_and_another_seed_others() {
    let logits = Array1::from_iter((0..64).map(|i| (i as f32 * 0.71).cos()));
    let opts = GenerateOptions::default();
    let draw = |seed| {
        let mut g = Generator::seeded(seed);
        (0..200)
            .map(|_| sample(&logits.view(), &opts, &mut g).unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(draw(3), draw(3));
    let (a, b) = (draw(3), draw(4));
    let same = a.iter().zip(&b).filter(|(x, y)| x == y).count();
    // Top-k keeps 6 of 64: two independent streams agree about a sixth of the time.
    assert!(same < 80, "{same} of 200 equal across seeds");
}

/// How many of `draws` samples with the same seeds differ between two sets of logits.
fn moved_draws(a: &Array1<f32>, b: &Array1<f32>, draws: usize) -> usize {
    let opts = GenerateOptions::default();
    let (mut ga, mut gb) = (Generator::seeded(9), Generator::seeded(9));
    (0..draws)
        .filter(|_| {
            sample(&a.view(), &opts, &mut ga).unwrap() != sample(&b.view(), &opts, &mut gb).unwrap()
        })
        .count()
}

#[test]
fn a_small_change_of_the_logits_rarely_moves_the_draw() {
    // A near-uniform top-k, as an untrained model's: 256 logits of spread 0.1, the kept 25
    // within a few hundredths of each other. Every logit moves by up to 1e-3 (a bf16 model's
    // error is a few times that).
    let mut g = Generator::seeded(5);
    let base = Array1::from_shape_simple_fn(256, || 0.1 * g.normal());
    let mut order: Vec<usize> = (0..256).collect();
    order.sort_by(|&a, &b| base[b].total_cmp(&base[a]));
    let mut moved = base.mapv(|x| x + 1e-3 * (2.0 * g.next_f32() - 1.0));
    let kept = |l: &Array1<f32>| {
        let k = performer_models::sampling::top_k(&l.view(), 0.9);
        (0..256).filter(|&i| k[i].is_finite()).collect::<Vec<_>>()
    };
    let draws = 4000;
    // The same 25 candidates: a draw moves only when its two best ratios lie within the
    // change (about 2 in 1000 here).
    assert_eq!(kept(&base).len(), 25);
    assert_eq!(kept(&base), kept(&moved));
    let changed = moved_draws(&base, &moved, draws);
    println!("same top-k: {changed} of {draws} draws moved");
    assert!(changed < draws / 100, "{changed} of {draws} draws moved");
    // The 25th and 26th largest trade places: the draws that picked the token leaving the
    // top-k, or that the entering one now wins, move (about 2 in 25: 333 of 4000). Inverting
    // the cumulative sum, as `sample` did before, moved 651: every boundary between the two
    // swapped tokens' indices shifts by a candidate's probability.
    let (edge, out) = (order[24], order[25]);
    moved[out] = moved[edge] + 1e-4;
    assert_ne!(kept(&base), kept(&moved));
    let changed = moved_draws(&base, &moved, draws);
    println!("top-k edge swapped: {changed} of {draws} draws moved");
    assert!(changed < draws * 3 / 25, "{changed} of {draws} draws moved");
}
