import numpy as np

from training.noise import GaussianNoise, OUNoise, make_noise


def test_gaussian_scale_and_independence() -> None:
    noise = GaussianNoise(2, sigma=0.1, seed=0)
    xs = np.stack([noise() for _ in range(20000)])
    assert xs.dtype == np.float32
    np.testing.assert_allclose(xs.std(axis=0), 0.1, rtol=0.03)
    np.testing.assert_allclose(xs.mean(axis=0), 0.0, atol=0.005)
    lag1 = np.corrcoef(xs[:-1, 0], xs[1:, 0])[0, 1]
    assert abs(lag1) < 0.03


def test_ou_is_correlated_mean_reverting_and_resets() -> None:
    theta, sigma = 0.15, 0.2
    noise = OUNoise(1, sigma=sigma, theta=theta, seed=0)
    xs = np.array([noise()[0] for _ in range(50000)])
    # AR(1) with coefficient 1 - theta: lag-1 correlation ~0.85, stationary std sigma/sqrt(1-(1-theta)^2)
    lag1 = np.corrcoef(xs[:-1], xs[1:])[0, 1]
    assert abs(lag1 - (1 - theta)) < 0.02
    expected_std = sigma / np.sqrt(1 - (1 - theta) ** 2)
    assert abs(xs.std() - expected_std) / expected_std < 0.08
    noise.x[:] = 5.0
    after = noise()[0]
    assert after < 5.0  # pulled back towards mu
    noise.reset()
    assert noise.x.tolist() == [0.0]


def test_state_restores_the_exact_sequence() -> None:
    for kind in ("ou", "gaussian"):
        a = make_noise(kind, 3, 0.2, 0.15, seed=7)
        for _ in range(10):
            a()
        saved = a.state_dict()
        expected = [a() for _ in range(5)]
        b = make_noise(kind, 3, 0.2, 0.15, seed=999)
        b.load_state_dict(saved)
        np.testing.assert_array_equal(np.stack([b() for _ in range(5)]), np.stack(expected))
