pub struct ModelConfig;
