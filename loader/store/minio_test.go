package store_test

import "github.com/minio/minio-go/v7"

func minioStatOpts() minio.StatObjectOptions { return minio.StatObjectOptions{} }
